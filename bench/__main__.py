from bench.cpu import main

raise SystemExit(main())
