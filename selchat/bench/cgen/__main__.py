"""`python -m selchat.bench.cgen ARGS`: build the C generator once and run it with ARGS."""
import sys

from selchat.bench.cgen import main

sys.exit(main())
