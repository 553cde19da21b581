from vlm_train.train.main import main

main()
