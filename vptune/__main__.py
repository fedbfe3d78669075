from vptune.cli import run

run()
