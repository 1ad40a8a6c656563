"""`python -m deploy.standin`: run the stand-in scoring server."""

from deploy.standin.cli import main

main()
