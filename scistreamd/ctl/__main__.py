"""python3 -m scistreamd.ctl: the same as the scistreamctl command."""

from .cli import run

run()
