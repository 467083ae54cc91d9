"""``python -m numclip_cli`` (also the torchrun entry point)."""

from numclip_cli.cli.app import main

main()
