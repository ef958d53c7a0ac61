"""sail: Diffusion-DPO and SAIL training engine for text-to-image diffusion models.

torch is a range, never a pin: a GPU machine brings its own CUDA build; on a CPU-only machine
install the CPU wheel first (`pip install torch==2.13.0`, see README), or pip resolves an
unpinned torch to several GB of CUDA packages.
"""
from setuptools import find_namespace_packages, setup

# One import name, `sail`: each top-level folder of the repository is installed as a subpackage
# (engine/ -> sail.engine, kernels/ -> sail.kernels, ...), so no folder name of ours can shadow a
# distribution of the stack (Hugging Face's `kernels` is one). configs/ ships as package data.
FOLDERS = ("engine", "kernels", "launch", "bench", "configs")
DATA_DIRS = ["*.__pycache__", "*.base_model*", "*.results"]   # shipped as package data, not packages
PACKAGES = ["sail"] + [f"sail.{pkg}" for folder in FOLDERS
                       for pkg in find_namespace_packages(include=[folder, f"{folder}.*"],
                                                          exclude=DATA_DIRS)]

setup(
    name="sail",
    version="0.1.0",
    description="Self-amplified preference alignment (Diffusion-DPO, SAIL) for text-to-image diffusion models",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"sail": "sail", **{f"sail.{folder}": folder for folder in FOLDERS}},
    package_data={"sail.engine.toy": ["base_model/*", "base_model/*/*"], "sail.configs": ["*.json"]},
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
        # DALI's CUDA 12 wheel also runs on the CPU (device_id=None): the loader's tests need it.
        "test": ["pytest>=7", "bitsandbytes>=0.45",
                 "nvidia-dali-cuda120; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        "gpu": ["xformers", "bitsandbytes>=0.45"],
        "dali": ["nvidia-dali-cuda120"],
        "bnb": ["bitsandbytes>=0.45"],
    },
    entry_points={"console_scripts": ["sail=sail.launch.cli:main"]},
)
