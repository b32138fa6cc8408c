from recjpq.cli import main

main()
