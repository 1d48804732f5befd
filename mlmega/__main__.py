from mlmega.cli import main

raise SystemExit(main())
