from mlmega.cli.main import main

raise SystemExit(main())
