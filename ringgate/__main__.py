from ringgate.cli import main

raise SystemExit(main())
