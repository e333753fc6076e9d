// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

/// @title NoReturnToken
/// @notice Test token whose transfer functions return nothing, and whose approvals go through 0 (like USDT on
/// mainnet).
contract NoReturnToken {
    mapping(address => uint256) public balanceOf;
    mapping(address => mapping(address => uint256)) public allowance;

    /// @notice Mints `amount` to `to` (tests only).
    function mint(address to, uint256 amount) external {
        balanceOf[to] += amount;
    }

    /// @notice Approves without returning a value; as USDT, refuses to change an allowance that is not 0 to
    /// another that is not 0 (set it to 0 first).
    function approve(address spender, uint256 amount) external {
        require(amount == 0 || allowance[msg.sender][spender] == 0, "approve from non-zero to non-zero");
        allowance[msg.sender][spender] = amount;
    }

    /// @notice Transfers without returning a value; reverts when the balance is short.
    function transfer(address to, uint256 amount) external {
        balanceOf[msg.sender] -= amount;
        balanceOf[to] += amount;
    }

    /// @notice Transfers from an allowance without returning a value.
    function transferFrom(address from, address to, uint256 amount) external {
        allowance[from][msg.sender] -= amount;
        balanceOf[from] -= amount;
        balanceOf[to] += amount;
    }
}
