"""SD Studio's installer: what ``launch.py`` decides and does before ``.venv`` exists.

Everything in this package imports only the Python standard library, because ``launch.py`` runs it
with whatever ``python3``/``py -3`` the user has, before any requirement is installed. It is split so
that each decision can be unit-tested with faked inputs (captured ``nvidia-smi`` output, a faked
``sys.platform``, a faked disk):

* :mod:`installer.gpu`: NVIDIA GPUs, VRAM, driver and the CUDA version the driver supports.
* :mod:`installer.torch_builds`: the one table of PyTorch CUDA builds and the choice of build.
* :mod:`installer.disk`: free-space checks with the amount needed, in words.
* :mod:`installer.pip_steps`: quiet pip runs with one progress line per step and a full log.
* :mod:`installer.environment`: the ``.venv`` life cycle that ``launch.py`` drives.
* :mod:`installer.launch_command`: how the user started the studio, for the commands hints print.
"""
