"""`python -m cov3d …`: the command line, as torchrun launches it (`torchrun … -m cov3d train …`)."""

from cov3d.cli import app

app(prog_name="cov3d")
