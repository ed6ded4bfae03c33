from lls.service import main
from services.downloader.service import run

main("downloader", run)
