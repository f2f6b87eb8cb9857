import sys

from kdrun.bench import main

sys.exit(main())
