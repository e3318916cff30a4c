"""Package discovery (metadata lives in pyproject.toml).

The Hydra configs stay in the top-level `conf/` directory, where users look for them, and ship
inside the package as `moe.conf`, so `config_path="pkg://moe.conf"` resolves in editable and
regular installs alike. pyproject.toml alone cannot add a remapped package to a `find` result.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["moe", "moe.*", "analysis", "analysis.*"]) + ["moe.conf"],
    package_dir={"moe.conf": "conf"},
)
