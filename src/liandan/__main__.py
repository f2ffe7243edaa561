"""``python -m liandan ...``: the ``liandan`` command run by a given interpreter. `liandan.jobs`
starts its runs this way, with the Python it runs in, not whichever ``liandan`` is first on PATH.

    python -m liandan sft --config recipe.yaml -o runs/sft
"""

from .cli import app

if __name__ == "__main__":  # imported (as the package's tests import every module), it runs nothing
    app(prog_name="liandan")
