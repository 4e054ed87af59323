"""``python -m structvpr_jax.data.synthetic {generate,montage} ...`` (see `generate.main`)."""

from structvpr_jax.data.synthetic.generate import main

if __name__ == "__main__":
  main()
