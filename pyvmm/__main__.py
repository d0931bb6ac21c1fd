from pyvmm.cli import main

raise SystemExit(main())
