"""Small models built in tests: an MLP, a CNN with grouped/depthwise convs, a transformer block."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32, padding_mode="reflect")
        self.dilated = nn.Conv2d(32, 32, 3, padding=2, dilation=2, stride=2)
        self.seq = nn.Conv1d(8, 8, 3, padding="same")
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.grouped(x))
        x = F.relu(self.depthwise(x))
        x = F.relu(self.dilated(x))
        b = x.shape[0]
        x = self.seq(x.reshape(b, 8, -1)).reshape(b, -1)
        return self.head(x)


class Block(nn.Module):
    """Pre-norm transformer block with hand-written attention and a functional matmul weight."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.readout = nn.Parameter(torch.randn(d, 16) / d ** 0.5)  # used through torch.matmul

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        x = x + self.ff2(F.gelu(self.ff1(self.norm2(x))))
        return torch.matmul(x, self.readout)


class Functional(nn.Module):
    """Weights used only through functional ops (F.linear, F.conv2d, torch.addmm)."""

    def __init__(self):
        super().__init__()
        self.w_conv = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2)
        self.w_lin = nn.Parameter(torch.randn(32, 8 * 6 * 6) * 0.05)
        self.w_mm = nn.Parameter(torch.randn(32, 10) * 0.2)
        self.bias = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w_conv))
        x = F.relu(F.linear(x.flatten(1), self.w_lin))
        return torch.addmm(self.bias, x, self.w_mm)
