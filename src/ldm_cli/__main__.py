"""`python -m ldm_cli …` — needed for `accelerate launch -m ldm_cli …`."""

from ldm_cli.cli import main

if __name__ == "__main__":
    main()
