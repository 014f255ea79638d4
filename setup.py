"""Package discovery (metadata lives in pyproject.toml).

Two top-level folders of the repository are installed inside the package, where users of a checkout look for them
(next to the code) and where an installed copy can find them: ``recipes/`` as ``verl_hindsight.recipes`` and
``envs/`` (the benchmark adapters) as ``verl_hindsight.envs``. Every package is found, none is listed by hand.
"""

from setuptools import find_packages, setup

MAPPED = {"verl_hindsight.recipes": "recipes", "verl_hindsight.envs": "envs"}

packages = find_packages(include=["verl_hindsight", "verl_hindsight.*"])
package_dir = {}
for name, folder in MAPPED.items():
    packages.append(name)
    package_dir[name] = folder
    for sub in find_packages(where=folder):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/" + sub.replace(".", "/")

setup(packages=packages, package_dir=package_dir)
