from lrsweep.cli import main


main()
