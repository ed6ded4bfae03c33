from lls.service import main

from .service import run

main("placer", run)
