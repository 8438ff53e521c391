"""Only what pyproject.toml cannot say: the browser page, kept in web/ at the repository root, ships inside the
wheel as the package data of ``bioadapt.web`` (its folders listed as packages so setuptools copies them without
warnings). Everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import find_packages, setup

PAGE_FOLDERS = sorted(folder.relative_to("web") for folder in Path("web").rglob("*") if folder.is_dir())
setup(packages=find_packages(include=["bioadapt*"]) + ["bioadapt.web"]
      + ["bioadapt.web." + ".".join(folder.parts) for folder in PAGE_FOLDERS],
      package_dir={"bioadapt.web": "web"})
