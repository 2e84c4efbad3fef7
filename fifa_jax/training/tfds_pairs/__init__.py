"""tensorflow-datasets builders for the encode stage's output (tfds wants builders in a
package); see `fifa_jax/training/pair_dataset.py` for how they are written and opened."""
from fifa_jax.training.tfds_pairs.builders import FifaDpoPairs, FifaDpoPrompts

__all__ = ["FifaDpoPairs", "FifaDpoPrompts"]
