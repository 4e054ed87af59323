"""structvpr_jax: StructVPR (CVPR 2023) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="structvpr_jax",
    version="0.1.0",
    description=("StructVPR (Shen et al., CVPR 2023): structural knowledge "
                 "distillation for visual place recognition, in JAX/Flax."),
    packages=find_packages(include=["structvpr_jax", "structvpr_jax.*"]),
    # the C++ source of the native CPU kernels, compiled on first use
    package_data={"structvpr_jax.models.native": ["*.cc"]},
    python_requires=">=3.11",
    install_requires=[
        # jax is deliberately not pinned: on Python 3.11 the resolver picks
        # 0.10.x, on newer Pythons 0.12+; the code runs on both.
        "jax",
        "flax",
        "optax",
        "orbax-checkpoint",
        "tensorflow-datasets",
        # streaming input (Grain iterators) and pre-resized image records
        "grain",
        "array_record",
        "numpy",
        "scipy",
        "faiss-cpu",
        "ml-collections",
        "absl-py",
        "pillow",
        "importlib_resources",  # tfds needs it but does not declare it
        "tqdm",
        "matplotlib",
        # TFLite runtime: the default run initialises the RGB branch from the
        # ImageNet MobileNetV2 .tflite file (models/pretrained.py) when found;
        # segment.py uses it too.
        "ai-edge-litert",
        # eval.rerank="ransac": USAC homography / fundamental matrix (rerank.py;
        # imported only when used)
        "opencv-python-headless",
    ],
    extras_require={
        # TFLite runtime: offline segmentation (segment.py) and ImageNet
        # MobileNetV2 weights from .tflite (models/pretrained.py).
        "segment": ["ai-edge-litert"],
        "test": ["pytest", "pytest-xdist", "ai-edge-litert"],
        # experiments/performance/bench.py's PyTorch reference
        # (experiments/performance/torch_reference.py): the CPU wheel of torch 2.13.0.
        "bench": ["torch==2.13.0"],
    },
)
