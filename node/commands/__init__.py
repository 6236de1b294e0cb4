"""One module per `macmesh` command; node/cli.py assembles them."""
