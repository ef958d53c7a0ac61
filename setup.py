"""sail: Diffusion-DPO and SAIL training engine for text-to-image diffusion models.

torch is a range, never a pin: a GPU machine brings its own CUDA build; on a CPU-only machine
install the CPU wheel first (`pip install torch==2.13.0`, see README), or pip resolves an
unpinned torch to several GB of CUDA packages.
"""
from setuptools import find_packages, setup

setup(
    name="sail",
    version="0.1.0",
    description="Self-amplified preference alignment (Diffusion-DPO, SAIL) for text-to-image diffusion models",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "launch", "launch.*",
                                    "bench", "bench.*"]),
    package_data={"engine.toy": ["base_model/*", "base_model/*/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4,<2.14",
        "diffusers>=0.30",
        "transformers>=4.45",
        "tokenizers",
        "safetensors>=0.4",
        "pyarrow>=14",
        "numpy",
        "pillow",
        "click>=8",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "scipy",
        "deepspeed>=0.19.3",
        "triton>=3.0; platform_system == 'Linux'",
        "peft>=0.12",
    ],
    extras_require={
        "test": ["pytest>=7", "bitsandbytes>=0.45"],
        "gpu": ["xformers", "bitsandbytes>=0.45"],
        "dali": ["nvidia-dali-cuda120"],
        "bnb": ["bitsandbytes>=0.45"],
    },
    entry_points={"console_scripts": ["sail=launch.cli:main"]},
)
