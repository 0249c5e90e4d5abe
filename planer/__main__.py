from planer.compiler.driver.cli import main

raise SystemExit(main())
