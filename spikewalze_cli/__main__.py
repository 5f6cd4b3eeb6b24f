from spikewalze_cli.cli import main

main()
