from ossforge.cli import main

raise SystemExit(main())
