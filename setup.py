"""Build hook only (the project is described in pyproject.toml): ship ``lmms_vg_tasks.pth`` at the top of the wheel.

The .pth file makes every Python of the environment install lmms-vg's task hook at start (a few
lines, no imports of lmms-eval), so that lmms-eval's listings that load no model plugin
(``lmms-eval tasks list``) find lmms-vg's tasks too. See ``tasks/_hook.py`` (installed as ``lmms_vg_tasks._hook``).

A regular wheel gets it beside the packages; an editable one (``pip install -e .``) at the top of
the editable wheel, which setuptools' editable build fills through the ``install`` command's
``install_lib``. Either way it is in the installed RECORD, so ``pip uninstall lmms-vg`` removes it.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "lmms_vg_tasks.pth"  # shipped at the top of the wheel
SOURCE = os.path.join("tasks", PTH)


class BuildWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(SOURCE, os.path.join(self._pth_dir(), PTH), preserve_mode=False)

    def _pth_dir(self) -> str:
        if getattr(self, "editable_mode", False):  # the editable wheel's root (setuptools' editable_wheel sets it)
            return self.get_finalized_command("install").install_lib
        return self.build_lib

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self._pth_dir(), PTH)]


setup(cmdclass={"build_py": BuildWithPth})
