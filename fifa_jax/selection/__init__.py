"""FiFA selection: exact k-NN, k-NN entropy, importance top-K, greedy set maximisation.

The select stage (`fifa_jax.selection.stage`) is imported on demand: it needs pyarrow,
ml-collections and matplotlib, the kernels here need only jax and numpy.
"""
from fifa_jax.selection.entropy import kl_entropy, kl_entropy_from_log_rho, log_rho_k
from fifa_jax.selection.greedy import GreedyResult, greedy_select, set_objective
from fifa_jax.selection.importance import (average_rank, combined_score, margin_term,
                                           normalize, top_k_pairs)
from fifa_jax.selection.knn import knn

__all__ = ["knn", "kl_entropy", "kl_entropy_from_log_rho", "log_rho_k", "greedy_select",
           "GreedyResult", "set_objective", "normalize", "average_rank", "margin_term",
           "combined_score", "top_k_pairs"]
