"""``python -m fints.serving``: run the server (same options as ``fints serve``)."""

import typer

from fints.serving.commands import serve

if __name__ == "__main__":
    typer.run(serve)
