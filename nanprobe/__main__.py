from nanprobe.cli import main

main()
