import torch
from relaxtune.potentials import load_model
base = load_model("chgnet").state_dict()
ck = torch.load("/tmp/acc/frames2/seed0/best.pt", weights_only=True)
sd = ck["state_dict"]
ck["state_dict"] = type(sd)((k, base[k] + 0.9 * (v - base[k]) if v.is_floating_point() else v) for k, v in sd.items())
torch.save(ck, "/tmp/precon/a09.pt")
