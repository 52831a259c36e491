from refiner.cli import main

main()
