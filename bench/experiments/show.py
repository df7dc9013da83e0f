import json,sys
keys=sys.argv[1].split(',') if len(sys.argv)>1 and sys.argv[1] else ['mse','z_e2_mean','z_e2_pool5max','ssim7','lf2','lf4','blur7','z_lf2','lat_maha','lat_1nn','z_e2_mean+z_e2_pool5max']
flt=sys.argv[2] if len(sys.argv)>2 else ''
print('tag cls t '+' '.join(k[:10] for k in keys))
for l in open('results.jsonl'):
    r=json.loads(l)
    if flt not in r['tag']: continue
    print(r['tag'],r['cls'],r['train_s'],' '.join(f"{r['auc'].get(k,0):.3f}" for k in keys))
