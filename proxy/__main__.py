import sys

from proxy.app.entry import main

sys.exit(main())
