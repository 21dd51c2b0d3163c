from moeops.cli import main

raise SystemExit(main())
