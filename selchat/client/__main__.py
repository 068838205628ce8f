"""`python -m selchat.client` runs the same entry point as `selchat-client`."""

import sys

from selchat.client.app import main

sys.exit(main())
