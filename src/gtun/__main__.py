from gtun.cli import main

raise SystemExit(main())
