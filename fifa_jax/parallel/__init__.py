"""Devices: mesh construction, multi-host start-up, batch and parameter sharding; `hosts`:
barriers and process 0's decisions told to every host."""
from fifa_jax.parallel.mesh import (AXES, BATCH_AXES, batch_multiple, batch_sharding,
                                    constrain_batch,
                                    default_config, initialize_distributed, make_mesh,
                                    mesh_shape, pad_batch, put_global, replicated,
                                    shard_batch, to_host)
from fifa_jax.parallel.param_sharding import (param_shardings, param_shardings_from_config,
                                              rules_from_config, state_rules_from_config)

__all__ = ["AXES", "BATCH_AXES", "batch_multiple", "batch_sharding", "constrain_batch",
           "default_config",
           "initialize_distributed", "make_mesh", "mesh_shape", "pad_batch", "param_shardings",
           "param_shardings_from_config", "put_global", "replicated", "rules_from_config",
           "shard_batch", "state_rules_from_config", "to_host"]
