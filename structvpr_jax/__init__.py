"""structvpr_jax: StructVPR (Shen et al., CVPR 2023) in JAX/Flax."""

__version__ = "0.1.0"
