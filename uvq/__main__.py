"""`python -m uvq` (and `torchrun -m uvq`) enter the same CLI as the `uvq` script."""

from uvq.cli.app import main

if __name__ == "__main__":
    main()
