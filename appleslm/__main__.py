from appleslm.cli import main

raise SystemExit(main())
