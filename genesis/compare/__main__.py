"""`python -m genesis.compare`: the comparison's command line (genesis.compare.cli)."""

from genesis.compare.cli import script

if __name__ == "__main__":
    script()
