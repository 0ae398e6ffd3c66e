# the probes of README.md here, one after another (about 4 minutes on 2 cores); logs beside this file
set -e
cd "$(dirname "$0")/../.."
common="config/shakespeare_adaptive_sparse.py --scale=cpu --seed=1337 --wandb_log=False --max_iters=250 --eval_interval=1000 --log_interval=25"
python train.py $common --out_dir=/tmp/as-kmin-probe --as_k_min=1 --as_k_max=4 > results/as-kmin-probe/kmin1.log 2>&1
python train.py $common --out_dir=/tmp/as-kmin-probe --as_k_min=2 --as_k_max=4 > results/as-kmin-probe/kmin2.log 2>&1
python results/as-kmin-probe/no_straight_through.py $common --out_dir=/tmp/as-kmin-probe --as_k_min=2 --as_k_max=4 > results/as-kmin-probe/kmin2-no-straight-through.log 2>&1
python train.py $common --out_dir=/tmp/as-kmin-probe --as_k_min=3 --as_k_max=4 --learning_rate=1e-3 > results/as-kmin-probe/kmin3-lr1e-3.log 2>&1
