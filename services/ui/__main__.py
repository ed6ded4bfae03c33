from lls.service import main
from services.ui.service import run

main("ui", run)
