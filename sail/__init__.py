"""sail: Diffusion-DPO and SAIL training engine for text-to-image diffusion models.

``sail`` is the project's one import name. The repository's top-level folders are its
subpackages: ``engine/`` is ``sail.engine``, ``kernels/`` is ``sail.kernels``, ``launch/`` is
``sail.launch``, ``bench/`` is ``sail.bench`` (setup.py maps them so in an install). In a
checkout the repository root joins this package's path, so scripts run in place and pytest
find the same modules without an install.

``kernels/`` has no ``__init__.py`` on purpose: with the repository root on ``sys.path``
(``python -m ...`` from the root, pytest), a folder without one is only a namespace portion,
and any installed regular package of that name wins, here Hugging Face's ``kernels``, which
transformers 5 imports. ``tests/launch/test_install.py`` checks that no import name of ours
equals one that an installed distribution provides.
"""
from pathlib import Path

__version__ = "0.1.0"

_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "setup.py").is_file() and (_ROOT / "engine" / "__init__.py").is_file():
    __path__.append(str(_ROOT))  # a checkout: engine/, kernels/, ... live beside sail/
