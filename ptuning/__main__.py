from ptuning.cli import main
import sys
sys.exit(main())
