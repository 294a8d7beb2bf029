from nanprobe.launch import main

main()
