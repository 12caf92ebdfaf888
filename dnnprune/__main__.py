from dnnprune.cli import main

main()
